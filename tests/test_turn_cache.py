"""TurnCache: a follow-up chat turn reuses the exact ids of the turn before it."""

from __future__ import annotations

from tristream.tokenizer_proc.turn_cache import TurnCache


def test_follow_up_reuses_generated_ids_that_retokenize_differently(tokenizer):
    nl2 = tokenizer.convert_tokens_to_ids("ĊĊ")
    prompt_text = "<|im_start|>user\nList two things.<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    reply_ids = (
        tokenizer.encode("Here:", add_special_tokens=False)
        + [nl2]
        + tokenizer.encode("1. Sun", add_special_tokens=False)
    )
    reply_text = tokenizer.decode(reply_ids)
    follow_up = prompt_text + reply_text + "<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n"
    plain = tokenizer.encode(follow_up, add_special_tokens=False)
    assert plain[: len(prompt_ids) + len(reply_ids)] != prompt_ids + reply_ids  # retokenizing loses the hit

    cache = TurnCache(tokenizer)
    cache.remember(prompt_text, prompt_ids, reply_text, reply_ids)
    ids = cache.encode(follow_up)
    assert ids[: len(prompt_ids) + len(reply_ids)] == prompt_ids + reply_ids
    assert tokenizer.decode(ids) == tokenizer.decode(plain) == follow_up
    assert cache.encode("unrelated text") == tokenizer.encode("unrelated text", add_special_tokens=False)


def test_a_reply_whose_ids_do_not_spell_its_text_is_not_remembered(tokenizer):
    cache = TurnCache(tokenizer)
    cache.remember("p", tokenizer.encode("p"), "hello", tokenizer.encode("goodbye"))
    assert cache.turns == {}


def test_capacity_evicts_the_least_recently_used_turn(tokenizer):
    cache = TurnCache(tokenizer, capacity=2)
    for word in ("alpha", "beta"):
        cache.remember(word, tokenizer.encode(word), " one", tokenizer.encode(" one"))
    cache.encode("alpha one and more")
    cache.remember("gamma", tokenizer.encode("gamma"), " one", tokenizer.encode(" one"))
    assert list(cache.turns) == ["alpha one", "gamma one"]
