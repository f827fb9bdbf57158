"""Cache-aware routing of requests over data-parallel engine replicas.

Each replica gets a :class:`PrefixTree` of the keys recently sent to it, a stand-in
for what its prefix cache probably holds. :class:`PrefixRouter` sends a request to
the replica that holds the longest prefix of its key while loads are balanced, and
to the least loaded replica otherwise. Keys are plain strings; :func:`prompt_key`
makes one from a request's fields.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PrefixRouter", "PrefixTree", "prompt_key"]


@dataclass(eq=False)
class _Node:
    """A node of a :class:`PrefixTree`; ``label`` is the edge from its parent."""

    label: str
    parent: _Node | None
    last_access: float
    children: dict[str, _Node] = field(default_factory=dict)


def _common_length(a: str, b: str, start: int) -> int:
    """How many characters ``a`` and ``b[start:]`` share from their starts."""
    if b.startswith(a, start):
        return len(a)
    # Binary search on startswith keeps the character comparisons in C.
    lo, hi = 0, min(len(a), len(b) - start)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    """A radix tree of strings with least-recently-used eviction of its leaves.

    ``match`` and ``insert`` walk the key once, comparing edge labels in C. Leaves wait in a heap keyed by their
    last access; entries that went stale (the leaf got a child, was touched again or
    was dropped) are skipped when popped, and the heap is rebuilt once they pile up.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget every key."""
        self._root = _Node("", None, 0.0)
        self._chars = 0
        self._nodes = 0
        self._heap: list[tuple[float, int, _Node]] = []
        self._seq = itertools.count()

    @property
    def chars(self) -> int:
        """Characters held: the sum of the edge label lengths."""
        return self._chars

    def match(self, key: str) -> int:
        """The length of the longest prefix of ``key`` that the tree holds."""
        node, pos = self._root, 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_length(child.label, key, pos)
            pos += n
            if n < len(child.label):
                break
            node = child
        return pos

    def insert(self, key: str, now: float) -> None:
        """Hold ``key``, marking every node on its path as used at ``now``."""
        node, pos = self._root, 0
        node.last_access = now
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                self._add_leaf(node, key[pos:], now)
                return
            n = _common_length(child.label, key, pos)
            if n < len(child.label):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        if not node.children and node is not self._root:
            self._push(node)

    def evict(self, max_chars: int) -> None:
        """Drop least recently used leaf edges until at most ``max_chars`` characters are held."""
        while self._chars > max_chars and self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            parent = node.parent
            if parent is None or node.children or stamp != node.last_access:
                continue
            del parent.children[node.label[0]]
            node.parent = None
            self._chars -= len(node.label)
            self._nodes -= 1
            if not parent.children and parent is not self._root:
                self._push(parent)

    def _add_leaf(self, parent: _Node, label: str, now: float) -> None:
        leaf = _Node(label, parent, now)
        parent.children[label[0]] = leaf
        self._chars += len(label)
        self._nodes += 1
        self._push(leaf)

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut ``child``'s edge after ``n`` characters; return the new node in between."""
        parent = child.parent
        assert parent is not None
        middle = _Node(child.label[:n], parent, child.last_access, {child.label[n]: child})
        parent.children[middle.label[0]] = middle
        child.label = child.label[n:]
        child.parent = middle
        self._nodes += 1
        return middle

    def _push(self, leaf: _Node) -> None:
        heapq.heappush(self._heap, (leaf.last_access, next(self._seq), leaf))
        if len(self._heap) > 2 * self._nodes + 64:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self._root:
                self._heap.append((node.last_access, next(self._seq), node))
        heapq.heapify(self._heap)


class PrefixRouter:
    """Picks an engine replica per request: the one caching the request's prefix, unless loads are imbalanced.

    Loads are balanced unless the live replicas' highest load exceeds the lowest by
    more than ``balance_abs`` and by a factor over ``balance_rel``; then the least
    loaded replica wins. Otherwise the replica whose tree matches the longest prefix
    wins if the match covers at least ``cache_threshold`` of the key, and the least
    loaded (then the one with the smallest tree) if not. Each tree is kept under
    ``max_chars`` characters.
    """

    def __init__(
        self,
        num_replicas: int,
        cache_threshold: float = 0.5,
        balance_abs: int = 32,
        balance_rel: float = 1.5,
        max_chars: int = 2**22,
    ) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        self.num_replicas = num_replicas
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.max_chars = max_chars
        self.trees = [PrefixTree() for _ in range(num_replicas)]

    def choose(self, key: str, loads: Sequence[int], alive: Sequence[bool], now: float | None = None) -> int:
        """The replica for a request with ``key``, given each replica's load and liveness; records the choice."""
        if len(loads) != self.num_replicas or len(alive) != self.num_replicas:
            raise ValueError(
                f"expected {self.num_replicas} loads and liveness flags, got {len(loads)} and {len(alive)}"
            )
        candidates = [i for i in range(self.num_replicas) if alive[i]]
        if not candidates:
            raise RuntimeError("no engine replica is alive")
        chosen = self._pick(key, loads, candidates)
        tree = self.trees[chosen]
        tree.insert(key, time.monotonic() if now is None else now)
        tree.evict(self.max_chars)
        return chosen

    def _pick(self, key: str, loads: Sequence[int], candidates: list[int]) -> int:
        low = min(loads[i] for i in candidates)
        high = max(loads[i] for i in candidates)
        if high - low > self.balance_abs and high > self.balance_rel * low:
            return min(candidates, key=lambda i: (loads[i], self.trees[i].chars, i))
        matched = {i: self.trees[i].match(key) for i in candidates}
        best = max(matched.values())
        if key and best > 0 and best >= self.cache_threshold * len(key):
            return min((i for i in candidates if matched[i] == best), key=lambda i: (loads[i], i))
        return min(candidates, key=lambda i: (loads[i], self.trees[i].chars, i))

    def matches(self, key: str) -> list[int]:
        """Each replica's longest held prefix of ``key``, in characters."""
        return [tree.match(key) for tree in self.trees]

    def forget(self, replica: int) -> None:
        """Clear what ``replica`` is thought to cache, as when it dies or restarts."""
        self.trees[replica].clear()


def _message_text(content: Any) -> str:
    """The text of a chat message's content: the string itself, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text") or "" for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def prompt_key(fields: dict[str, Any]) -> str:
    """The routing key of a request: its text prompt, its token ids or its chat messages as a string.

    A prefix of the token ids or of the conversation gives a prefix of the key.
    Image parts of messages are left out; fields other than ``role`` and
    ``content`` (tool calls and such) enter through their ``repr``.
    """
    prompt = fields.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return "".join(f"{t}," for t in prompt)
        return ""
    messages = fields.get("messages")
    if not isinstance(messages, list):
        return ""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        text = _message_text(message.get("content"))
        extra = sorted((k, v) for k, v in message.items() if k not in ("role", "content"))
        tail = f"\x1f{extra!r}" if extra else ""
        out.append(f"{message.get('role', '')}\x1f{text}{tail}\x1e")
    return "".join(out)
