"""Tests of the replica router: the prefix tree, the routing rule and the routing keys of requests."""

from __future__ import annotations

import os
import random

import pytest

from tristream.router import PrefixRouter, PrefixTree, prompt_key

LONG = "You are a helpful assistant. " * 8


def common_length(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def tree_of(*keys: str) -> PrefixTree:
    tree = PrefixTree()
    for t, key in enumerate(keys):
        tree.insert(key, float(t))
    return tree


# PrefixTree


def test_match_shared_prefixes_split_and_prefix_keys():
    tree = tree_of("hello world", "help", "hello")
    assert tree.match("hello world") == 11
    assert tree.match("hello there") == 6
    assert tree.match("help me") == 4
    assert tree.match("helium") == 3
    assert tree.match("hel") == 3
    assert tree.match("x") == 0
    assert tree.match("") == 0
    tree.insert("", 5.0)
    assert tree.chars == len("hello world") + len("p")


def test_match_on_empty_tree_and_key_inside_an_edge():
    tree = PrefixTree()
    assert tree.match("abc") == 0
    tree.insert("abcdef", 1.0)
    assert tree.match("abcxyz") == 3
    assert tree.match("abc") == 3
    assert tree.match("abcdefgh") == 6


def test_chars_counts_each_shared_character_once():
    tree = PrefixTree()
    tree.insert("abcdef", 1.0)
    assert tree.chars == 6
    tree.insert("abcxyz", 2.0)  # splits the edge after "abc"
    assert tree.chars == 9
    tree.insert("abc", 3.0)  # ends at the split point
    assert tree.chars == 9
    tree.insert("abcdef", 4.0)
    assert tree.chars == 9
    tree.insert("abcdefgh", 5.0)  # extends a leaf
    assert tree.chars == 11
    tree.insert("q", 6.0)
    assert tree.chars == 12
    tree.clear()
    assert tree.chars == 0
    assert tree.match("abcdef") == 0


def test_evict_drops_least_recently_used_leaf_first():
    tree = tree_of()
    tree.insert("aaaa", 1.0)
    tree.insert("bbbb", 2.0)
    tree.insert("cccc", 3.0)
    tree.insert("aaaa", 4.0)
    tree.evict(8)
    assert tree.chars == 8
    assert tree.match("aaaa") == 4
    assert tree.match("bbbb") == 0
    assert tree.match("cccc") == 4


def test_evict_touching_by_a_longer_key_refreshes_the_shared_path():
    tree = PrefixTree()
    tree.insert("xxxx-one", 1.0)
    tree.insert("yyyy", 2.0)
    tree.insert("xxxx-two", 3.0)  # touches "xxxx-" but not "one"
    tree.evict(tree.chars - 1)
    assert tree.match("xxxx-one") == 5
    assert tree.match("yyyy") == 4
    assert tree.match("xxxx-two") == 8


def test_evict_drops_a_parent_once_it_is_a_leaf():
    tree = PrefixTree()
    tree.insert("ab", 1.0)
    tree.insert("abcd", 2.0)  # "ab" is now internal, touched at 2
    tree.insert("zz", 3.0)
    tree.evict(2)
    assert tree.chars == 2
    assert tree.match("abcd") == 0
    assert tree.match("zz") == 2


def test_evict_to_zero_and_reuse():
    tree = tree_of("abc", "abd", "b")
    tree.evict(0)
    assert tree.chars == 0
    assert tree.match("abc") == 0
    tree.insert("abc", 10.0)
    assert tree.match("abcd") == 3
    assert tree.chars == 3


def test_evict_never_leaves_chars_over_the_bound():
    rng = random.Random(1)
    tree = PrefixTree()
    for t in range(2000):
        key = "".join(rng.choice("ab") for _ in range(rng.randint(0, 30)))
        tree.insert(key, float(t))
        tree.evict(200)
        assert tree.chars <= 200
    assert tree.chars > 150  # eviction drops whole leaves, not everything


def test_random_keys_match_brute_force():
    rng = random.Random(0)
    tree = PrefixTree()
    held: list[str] = []
    for t in range(400):
        key = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        tree.insert(key, float(t))
        held.append(key)
        probe = "".join(rng.choice("abc") for _ in range(rng.randint(0, 14)))
        for q in (probe, key, key[: len(key) // 2]):
            assert tree.match(q) == max(common_length(q, k) for k in held), q
    distinct: set[str] = set()
    for key in held:
        distinct.update(key[:i] for i in range(1, len(key) + 1))
    assert tree.chars == len(distinct)  # one character per distinct non-empty prefix


def test_random_keys_with_eviction_match_a_subset_of_the_recent_keys():
    rng = random.Random(2)
    tree = PrefixTree()
    held: list[str] = []
    for t in range(500):
        key = "".join(rng.choice("abcd") for _ in range(rng.randint(1, 20)))
        tree.insert(key, float(t))
        tree.evict(150)
        held.append(key)
        assert tree.match(key) == len(key)  # the newest key is never the LRU leaf
        probe = "".join(rng.choice("abcd") for _ in range(10))
        assert tree.match(probe) <= max(common_length(probe, k) for k in held)


def test_many_long_keys_stay_fast():
    rng = random.Random(3)
    base = [rng.randbytes(1000).hex() for _ in range(20)]
    tree = PrefixTree()
    for t in range(3000):
        key = rng.choice(base) + rng.randbytes(500).hex()
        tree.insert(key, float(t))
        tree.evict(1_000_000)
        assert tree.match(key) == len(key)
    assert tree.chars <= 1_000_000


# PrefixRouter


def test_repeated_prefix_returns_to_its_replica():
    router = PrefixRouter(4)
    first = router.choose(LONG + "question one", [0, 0, 0, 0], [True] * 4, now=1.0)
    assert first == 0
    # Balanced (5 - 0 is within balance_abs), so the busier replica with the prefix wins.
    assert router.choose(LONG + "question two", [5, 0, 0, 0], [True] * 4, now=2.0) == first
    assert router.matches(LONG + "question three")[first] >= len(LONG)


def test_fresh_key_goes_to_least_loaded():
    router = PrefixRouter(3)
    router.choose(LONG, [0, 0, 0], [True] * 3, now=1.0)
    assert router.choose("something unrelated", [3, 4, 1], [True] * 3, now=2.0) == 2
    assert router.matches("something unrelated") == [0, 0, len("something unrelated")]


def test_fresh_key_ties_go_to_the_smaller_tree_then_lower_index():
    router = PrefixRouter(3)
    router.choose("abcdef", [0, 0, 0], [True] * 3, now=1.0)
    assert router.choose("zzz", [0, 0, 0], [True] * 3, now=2.0) == 1
    assert router.choose("yyyyyyyy", [0, 0, 0], [True] * 3, now=3.0) == 2
    assert router.choose("xx", [0, 0, 0], [True] * 3, now=4.0) == 1


def cached_on_zero(num_replicas: int = 2, **kwargs: float) -> PrefixRouter:
    """A router whose replica 0 alone holds ``LONG``."""
    router = PrefixRouter(num_replicas, **kwargs)
    router.trees[0].insert(LONG, 0.0)
    return router


def test_equal_matches_prefer_less_loaded_then_lower_index():
    router = PrefixRouter(3, balance_abs=100)
    for tree in router.trees[1:]:
        tree.insert(LONG, 0.0)
    assert router.choose(LONG, [0, 7, 3], [True] * 3, now=1.0) == 2  # replica 0 has no match
    assert router.choose(LONG, [0, 3, 3], [True] * 3, now=2.0) == 1


def test_imbalanced_loads_override_the_cache():
    key = LONG + "?"
    assert cached_on_zero().choose(key, [9, 0], [True, True]) == 0
    assert cached_on_zero().choose(key, [100, 10], [True, True]) == 1
    # Over balance_abs apart but within balance_rel of each other: balanced.
    assert cached_on_zero().choose(key, [140, 100], [True, True]) == 0
    # Over balance_rel but within balance_abs: balanced.
    assert cached_on_zero().choose(key, [32, 0], [True, True]) == 0
    assert cached_on_zero().choose(key, [33, 0], [True, True]) == 1
    assert cached_on_zero(balance_abs=0, balance_rel=1.0).choose(key, [2, 1], [True, True]) == 1
    # Among equally loaded replicas the smaller tree wins.
    router = cached_on_zero(3)
    router.trees[1].insert("x" * 50, 0.0)
    assert router.choose(key, [100, 10, 10], [True] * 3) == 2


def test_dead_replicas_are_never_chosen():
    router = PrefixRouter(3)
    assert router.choose(LONG, [0, 0, 0], [True] * 3, now=1.0) == 0
    rng = random.Random(4)
    for t in range(50):
        loads = [rng.randint(0, 100) for _ in range(3)]
        chosen = router.choose(LONG + str(t), loads, [False, True, False], now=2.0 + t)
        assert chosen == 1
    # Imbalance is judged among the live replicas only.
    assert router.choose(LONG, [0, 60, 50], [False, True, True], now=100.0) == 1
    with pytest.raises(RuntimeError, match="no engine replica is alive"):
        router.choose(LONG, [0, 0, 0], [False] * 3)


def test_wrong_lengths_and_bad_replica_count_raise():
    router = PrefixRouter(2)
    with pytest.raises(ValueError):
        router.choose("a", [0], [True, True])
    with pytest.raises(ValueError):
        router.choose("a", [0, 0], [True])
    with pytest.raises(ValueError):
        PrefixRouter(0)


def test_forget_drops_a_replicas_matches():
    router = PrefixRouter(2)
    assert router.choose(LONG, [0, 0], [True, True], now=1.0) == 0
    assert router.choose("other", [5, 0], [True, True], now=2.0) == 1
    assert router.matches(LONG) == [len(LONG), 0]
    router.forget(0)
    assert router.matches(LONG) == [0, 0]
    assert router.matches("other") == [0, 5]
    assert router.choose(LONG, [3, 0], [True, True], now=3.0) == 1


def test_short_match_below_threshold_goes_to_least_loaded():
    router = PrefixRouter(2)
    router.choose("abcdefghij", [0, 0], [True, True], now=1.0)
    key = "abcd" + "z" * 6  # matches 4 of 10 characters on replica 0
    assert router.matches(key) == [4, 0]
    assert router.choose(key, [2, 1], [True, True], now=2.0) == 1
    # At the threshold exactly the cache wins.
    assert router.choose("abcde" + "y" * 5, [2, 1], [True, True], now=3.0) == 0
    strict = PrefixRouter(2, cache_threshold=0.9)
    strict.trees[0].insert("abcdefghij", 0.0)
    assert strict.choose("abcdefghiX", [2, 1], [True, True]) == 0
    assert strict.choose("abcdefghXX", [2, 1], [True, True]) == 1


def test_empty_key_goes_to_least_loaded():
    router = PrefixRouter(2)
    router.choose("", [0, 0], [True, True], now=1.0)
    assert router.choose("", [4, 2], [True, True], now=2.0) == 1


def test_trees_stay_under_max_chars():
    router = PrefixRouter(2, max_chars=100)
    for t in range(50):
        router.choose(f"{t:03d}" + "p" * 40, [0, 0], [True, True], now=float(t))
    assert all(0 < tree.chars <= 100 for tree in router.trees)


# prompt_key


def test_prompt_key_of_text_and_nothing():
    assert prompt_key({"prompt": "Hello there"}) == "Hello there"
    assert prompt_key({}) == ""
    assert prompt_key({"prompt": None}) == ""
    assert prompt_key({"messages": "not a list"}) == ""


def test_prompt_key_of_token_ids_keeps_prefixes():
    ids = [1, 23, 456, 7]
    key = prompt_key({"prompt": ids})
    assert key == "1,23,456,7,"
    for n in range(len(ids) + 1):
        assert key.startswith(prompt_key({"prompt": ids[:n]}))
    # [1] is not a prefix of [12], and its key must not be a prefix of theirs.
    assert not prompt_key({"prompt": [12]}).startswith(prompt_key({"prompt": [1]}))


def test_prompt_key_of_messages_skips_images():
    plain = {"messages": [{"role": "user", "content": "Describe it."}]}
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe "},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "it."},
                ],
            }
        ]
    }
    assert prompt_key(plain) == "user\x1fDescribe it.\x1e"
    assert prompt_key(parts) == prompt_key(plain)
    assert "AAAA" not in prompt_key(parts)
    assert prompt_key({"messages": [{"role": "assistant", "content": None}]}) == "assistant\x1f\x1e"


def test_prompt_key_of_messages_distinguishes_roles_and_extra_fields():
    user = prompt_key({"messages": [{"role": "user", "content": "hi"}]})
    system = prompt_key({"messages": [{"role": "system", "content": "hi"}]})
    assert user != system
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f"}}]}
    assert "'f'" in prompt_key({"messages": [call]})
    assert prompt_key({"messages": [call]}) != prompt_key({"messages": [{"role": "assistant", "content": None}]})


def test_prompt_key_of_a_conversation_extends_its_earlier_turns():
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    turn2 = turn1 + [
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
    ]
    key1, key2 = prompt_key({"messages": turn1}), prompt_key({"messages": turn2})
    assert key2.startswith(key1)
    assert len(key2) > len(key1)
    router = PrefixRouter(2)
    first = router.choose(key1, [0, 0], [True, True], now=1.0)
    assert router.choose(key2, [0, 0], [True, True], now=2.0) == first
