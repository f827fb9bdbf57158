"""Tests for the incremental detokenizer."""

from __future__ import annotations

import random
import string
from typing import Any

import pytest

from tristream.model_files import resolve_model
from tristream.tokenizer_proc.detokenizer import (
    PROMPT_CONTEXT_TOKENS,
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    skipped_token_ids,
)

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 42, isn't it?",
    "chinese": "你好，世界！今天天气很好。",
    "emoji": "🙂🚀👍🏽",
    "mixed": "Hello 你好 🙂! Ünïcödé — ok 👍🏽 done.",
    "newlines": "line one\nline two\n\n  indented\tand tabbed\r\nlast",
}


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer (byte-level BPE)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(None))


@pytest.fixture(scope="session")
def chat_prompt(tokenizer: Any) -> list[int]:
    """Prompt ids of a one-turn chat ending with the assistant header."""
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say something."}], add_generation_prompt=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int]) -> list[str]:
    """Push `ids` in chunks of the given sizes (cycled), then flush; return every delta."""
    deltas, i, k = [], 0, 0
    while i < len(ids):
        size = chunk_sizes[k % len(chunk_sizes)]
        deltas.append(detok.push(ids[i : i + size]))
        i, k = i + size, k + 1
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_one_token_at_a_time(tokenizer: Any, chat_prompt: list[int], name: str) -> None:
    text = TEXTS[name]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    detok = IncrementalDetokenizer(tokenizer, chat_prompt)
    deltas = _stream(detok, ids, [1])
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.text == text
    if name in ("chinese", "emoji"):
        assert "" in deltas[:-1], "multi-token characters must be held back"


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_random_chunks(tokenizer: Any, chat_prompt: list[int], name: str, seed: int) -> None:
    ids = tokenizer.encode(TEXTS[name])
    rng = random.Random(seed)
    sizes = [rng.randint(1, 6) for _ in range(len(ids))]
    detok = IncrementalDetokenizer(tokenizer, chat_prompt)
    deltas = _stream(detok, ids, sizes)
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == detok.text


def test_without_prompt(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXTS["mixed"])
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join(_stream(detok, ids, [2, 1, 3])) == TEXTS["mixed"]


def test_prompt_ending_in_partial_character_is_not_used_as_context(tokenizer: Any) -> None:
    prompt = tokenizer.encode("Q: 你")
    partial_prompt = prompt[:-1]
    assert tokenizer.decode(partial_prompt).endswith(REPLACEMENT_CHAR)
    ids = tokenizer.encode("好 ok")
    detok = IncrementalDetokenizer(tokenizer, partial_prompt)
    assert "".join(_stream(detok, ids, [1])) == tokenizer.decode(ids)


def test_skip_special_tokens(tokenizer: Any) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hello") + [im_end] + tokenizer.encode(" there 🙂") + [im_end]
    skipped = "".join(_stream(IncrementalDetokenizer(tokenizer, []), ids, [1]))
    assert skipped == tokenizer.decode(ids, skip_special_tokens=True) == "Hello there 🙂"
    kept = "".join(_stream(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False), ids, [1]))
    assert kept == tokenizer.decode(ids, skip_special_tokens=False)
    assert kept.count("<|im_end|>") == 2


def test_skipped_ids_match_decode(tokenizer: Any) -> None:
    skipped = skipped_token_ids(tokenizer)
    assert skipped > set(tokenizer.all_special_ids)
    for token_id in tokenizer.added_tokens_decoder:
        dropped = tokenizer.decode([token_id], skip_special_tokens=True) == ""
        assert dropped == (token_id in skipped)


def test_flush_returns_incomplete_character(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 你好")
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith(REPLACEMENT_CHAR))
    partial = tokenizer.decode(ids[:cut])
    detok = IncrementalDetokenizer(tokenizer, [])
    head = detok.push(ids[:cut])
    assert REPLACEMENT_CHAR not in head
    assert detok.push([]) == ""
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT_CHAR)
    assert head + tail == partial == detok.text
    assert detok.flush() == ""


class _RecordingTokenizer:
    """Delegates to a tokenizer and records the length of every decode call."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.decode_lengths: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decode_lengths.append(len(ids))
        return self._inner.decode(ids, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.parametrize("max_chunk", [1, 4])
def test_decode_window_is_bounded(tokenizer: Any, chat_prompt: list[int], max_chunk: int) -> None:
    ids = tokenizer.encode(" ".join(TEXTS.values()) * 40)
    assert len(ids) > 2000
    recording = _RecordingTokenizer(tokenizer)
    rng = random.Random(max_chunk)
    sizes = [rng.randint(1, max_chunk) for _ in range(len(ids))]
    detok = IncrementalDetokenizer(recording, chat_prompt)
    assert "".join(_stream(detok, ids, sizes)) == tokenizer.decode(ids)
    # The window holds the previous step's ids plus unemitted ones (each at most a chunk
    # plus 3 held-back tokens), whatever the output length.
    assert max(recording.decode_lengths) <= PROMPT_CONTEXT_TOKENS + 2 * (max_chunk + 3)
    # At most 4 window decodes and 1 prefix decode per push, plus the prompt context.
    assert len(recording.decode_lengths) <= 5 * len(ids) + 1


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> Any:
    """A tiny Llama-style tokenizer: Metaspace pieces, byte fallback, leading space stripped on decode."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", *string.ascii_letters, *string.digits, *",.!?", "▁w", "or"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "w"), ("o", "r")], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_sentencepiece_output_decodes_in_prompt_context(sentencepiece_tokenizer: Any, skip_special_tokens: bool) -> None:
    tok = sentencepiece_tokenizer
    prompt = [tok.bos_token_id] + tok.encode("say hello")
    output = tok.encode("world 你好 🙂") + [tok.eos_token_id] + tok.encode("again")
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas = _stream(detok, output, [1])
    assert not any(REPLACEMENT_CHAR in d for d in deltas)

    skipped = skipped_token_ids(tok) if skip_special_tokens else frozenset()
    context = [t for t in prompt if t not in skipped][-PROMPT_CONTEXT_TOKENS:]
    kept = [t for t in output if t not in skipped]

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    expected = decode(context + kept)[len(decode(context)) :]
    assert "".join(deltas) == expected
    assert deltas[0] == " w"
    assert decode(output) == expected.lstrip(" ")
    assert expected.endswith(" again")
