"""RadixCache: a tree of token runs whose KV pages can be shared between requests.

Nodes hold whole pages: ``len(node.tokens) == len(node.pages) * page_size``, and
splits fall on page boundaries. A node that a running request uses is locked
(its lock count, and its ancestors', is above zero) and cannot be evicted.
Unlocked leaves are evicted least recently used first.

Each namespace (a LoRA adapter's id; 0 is the base model) has a tree of its own, since
the same tokens have different KV under different adapters.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tristream.scheduler_proc.kv_pages import PageAllocator

_clock = itertools.count()


@dataclass(eq=False)
class Node:
    """A run of tokens and the pages holding their KV."""

    tokens: list[int]
    pages: list[int]
    parent: Node | None = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    lock_count: int = 0
    last_used: int = 0


class RadixCache:
    """Prefix tree over KV pages; owns the pages of its nodes."""

    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        self.page_size = page_size
        self.allocator = allocator
        self.roots: dict[int, Node] = {0: Node([], [], lock_count=1)}
        self.num_pages = 0

    def _key(self, tokens: list[int], start: int) -> tuple[int, ...]:
        return tuple(tokens[start : start + self.page_size])

    def _split(self, node: Node, num_pages: int) -> Node:
        """Cut ``node`` after ``num_pages`` pages; returns the new upper part."""
        cut = num_pages * self.page_size
        upper = Node(node.tokens[:cut], node.pages[:num_pages], node.parent, {}, node.lock_count, node.last_used)
        upper.parent.children[self._key(upper.tokens, 0)] = upper
        node.tokens, node.pages, node.parent = node.tokens[cut:], node.pages[num_pages:], upper
        upper.children[self._key(node.tokens, 0)] = node
        return upper

    def match(self, tokens: list[int], namespace: int = 0, touch: bool = True) -> tuple[Node, list[int]]:
        """The longest cached whole-page prefix of ``tokens``: its last node and pages.

        With ``touch`` a partial match splits its node and the matched nodes count as just used;
        without, the tree stays as it is and a partial match ends at the node above.
        """
        ps = self.page_size
        node, pages = self.roots.setdefault(namespace, Node([], [], lock_count=1)), []
        stamp = next(_clock)
        while (i := len(pages) * ps) + ps <= len(tokens):
            child = node.children.get(self._key(tokens, i))
            if child is None:
                break
            matched = 1
            while matched < len(child.pages) and i + (matched + 1) * ps <= len(tokens):
                start = matched * ps
                if child.tokens[start : start + ps] != tokens[i + start : i + start + ps]:
                    break
                matched += 1
            if matched < len(child.pages):
                if not touch:
                    return node, pages + child.pages[:matched]
                child = self._split(child, matched)
            if touch:
                child.last_used = stamp
            pages.extend(child.pages)
            node = child
        return node, pages

    def peek(self, tokens: list[int], namespace: int = 0) -> int:
        """Length of the longest cached whole-page prefix of ``tokens``, leaving the tree untouched."""
        return len(self.match(tokens, namespace, touch=False)[1]) * self.page_size

    def insert(self, tokens: list[int], pages: list[int], namespace: int = 0) -> tuple[Node, list[int]]:
        """Cache whole pages of ``tokens`` (``len(tokens) == len(pages) * page_size``).

        The tree adopts the pages past the part it already held. Returns the last
        node and the tree's pages for ``tokens``, which differ from ``pages`` where
        the tree already had its own copy: the caller still owns those.
        """
        assert len(tokens) == len(pages) * self.page_size
        node, tree_pages = self.match(tokens, namespace)
        if (i := len(tree_pages) * self.page_size) < len(tokens):
            rest = pages[i // self.page_size :]
            child = Node(tokens[i:], rest, node, {}, 0, next(_clock))
            node.children[self._key(child.tokens, 0)] = child
            self.num_pages += len(rest)
            tree_pages = tree_pages + rest
            node = child
        return node, tree_pages

    def lock(self, node: Node) -> None:
        """Protect ``node`` and its ancestors from eviction."""
        while node is not None:
            node.lock_count += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        """Undo one ``lock(node)``."""
        while node is not None:
            node.lock_count -= 1
            assert node.lock_count >= 0, "unlock without lock"
            node = node.parent

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` pages from unlocked leaves, oldest first; returns how many."""
        leaves = [(n.last_used, id(n), n) for n in self._nodes() if not n.children and n.lock_count == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_pages and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[self._key(leaf.tokens, 0)]
            self.allocator.free(leaf.pages)
            freed += len(leaf.pages)
            self.num_pages -= len(leaf.pages)
            if not parent.children and parent.lock_count == 0:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))
        return freed

    def _nodes(self):
        stack = [child for root in self.roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def all_pages(self) -> list[int]:
        """Every page the tree holds (for invariant checks)."""
        return [p for n in self._nodes() for p in n.pages]
