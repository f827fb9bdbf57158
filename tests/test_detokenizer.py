"""Tests for the incremental detokenizer."""

from __future__ import annotations

import random
import string
import time
from itertools import count
from typing import Any

import pytest

from tristream.model_files import resolve_model
from tristream.tokenizer_proc import detokenizer
from tristream.tokenizer_proc.detokenizer import (
    MIN_BATCH_DECODE,
    PROMPT_CONTEXT_TOKENS,
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    backend_decoder,
    push_step,
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
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
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
    assert "".join(deltas) == tokenizer.decode(ids)


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
    assert head + tail == partial
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
def test_sentencepiece_output_decodes_in_prompt_context(
    sentencepiece_tokenizer: Any, skip_special_tokens: bool
) -> None:
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


def _contract_text(tok: Any, prompt: list[int], output: list[int], skip_special_tokens: bool) -> str:
    """The output text that the IncrementalDetokenizer docstring promises."""
    skipped = skipped_token_ids(tok) if skip_special_tokens else frozenset()

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    context = [t for t in prompt if t not in skipped][-PROMPT_CONTEXT_TOKENS:]
    if decode(context).endswith(REPLACEMENT_CHAR):
        context = []
    return decode(context + [t for t in output if t not in skipped])[len(decode(context)) :]


def _stream_step_by_step(
    tok: Any, requests: list[tuple[list[int], list[int], dict]], rng: random.Random
) -> list[list[str]]:
    """Stream each request's (prompt, output ids, detokenizer settings) in random chunks, from a random first step.

    Every step pushes the live requests together through ``push_step`` and, as the
    reference, each alone through ``push`` on a tokenizer seen only through
    ``tokenizer.decode`` (as a slow tokenizer is); the two must give the same delta at
    every step. A request is flushed after its last chunk. Returns each request's deltas.
    """
    per_sequence = _RecordingTokenizer(tok)
    assert backend_decoder(tok) is tok.backend_tokenizer
    assert backend_decoder(per_sequence) is None
    batched = [IncrementalDetokenizer(tok, prompt, **kw) for prompt, _, kw in requests]
    alone = [IncrementalDetokenizer(per_sequence, prompt, **kw) for prompt, _, kw in requests]
    starts = [rng.randint(0, 4) for _ in requests]
    pos = [0] * len(requests)
    deltas: list[list[str]] = [[] for _ in requests]
    running = set(range(len(requests)))
    for step in count():
        if not running:
            break
        live = [i for i in running if starts[i] <= step]
        rng.shuffle(live)
        chunks = []
        for i in live:
            size = rng.randint(0, 4)
            chunks.append(requests[i][1][pos[i] : pos[i] + size])
            pos[i] += size
        for i, chunk, text in zip(live, chunks, push_step([batched[i] for i in live], chunks), strict=True):
            assert text == alone[i].push(chunk)
            deltas[i].append(text)
            if pos[i] >= len(requests[i][1]):
                tail = batched[i].flush()
                assert tail == alone[i].flush()
                deltas[i].append(tail)
                running.remove(i)
    assert per_sequence.decode_lengths, "the reference decodes one sequence per call"
    for detok in batched:
        assert detok.flush() == "", "after the flush nothing is held back"
    return deltas


@pytest.mark.parametrize("min_batch", [1, MIN_BATCH_DECODE])
@pytest.mark.parametrize("seed", range(3))
def test_push_step_matches_pushing_each_alone(
    tokenizer: Any, chat_prompt: list[int], seed: int, min_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(detokenizer, "MIN_BATCH_DECODE", min_batch)
    rng = random.Random(seed)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    partial_prompt = tokenizer.encode("Q: 你")[:-1]
    requests = []
    for _ in range(48):
        ids = []
        for name in rng.choices(sorted(TEXTS), k=rng.randint(1, 3)):
            ids += tokenizer.encode(TEXTS[name]) + ([im_end] if rng.random() < 0.3 else [])
        settings = {"skip_special_tokens": rng.random() < 0.5, "spaces_between_special_tokens": rng.random() < 0.5}
        requests.append((rng.choice([chat_prompt, [], partial_prompt]), ids, settings))
    assert len({tuple(kw.values()) for _, _, kw in requests}) == 4
    deltas = _stream_step_by_step(tokenizer, requests, rng)
    for (prompt, ids, kw), parts in zip(requests, deltas):
        assert not any(REPLACEMENT_CHAR in d for d in parts)
        expected = tokenizer.decode(ids, skip_special_tokens=kw["skip_special_tokens"])
        assert "".join(parts) == expected == _contract_text(tokenizer, prompt, ids, kw["skip_special_tokens"])
    assert any("" in parts[:-1] for parts in deltas), "some steps must hold back a partial character"


@pytest.mark.parametrize("seed", range(3))
def test_push_step_with_sentencepiece(sentencepiece_tokenizer: Any, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detokenizer, "MIN_BATCH_DECODE", 1)
    tok = sentencepiece_tokenizer
    rng = random.Random(seed)
    words = ["world", "hello", "你好", "🙂", "again", "ok!", "42"]
    requests = []
    for _ in range(24):
        ids = tok.encode(" ".join(rng.choices(words, k=rng.randint(1, 5))))
        if rng.random() < 0.5:
            ids += [tok.eos_token_id] + tok.encode(rng.choice(words))
        prompt = [tok.bos_token_id] + tok.encode(rng.choice(["say hello", "你", "hi 🙂"]))
        requests.append((prompt, ids, {"skip_special_tokens": rng.random() < 0.5}))
    deltas = _stream_step_by_step(tok, requests, rng)
    for (prompt, ids, kw), parts in zip(requests, deltas):
        assert "".join(parts) == _contract_text(tok, prompt, ids, kw["skip_special_tokens"])
        assert next(d for d in parts if d).startswith(" "), "the first token keeps its leading space"


class _RecordingBackend:
    """Delegates to a Rust tokenizer and records every decode and decode_batch call."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.decodes = 0
        self.batches: list[tuple[int, bool]] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decodes += 1
        return self._inner.decode(ids, **kwargs)

    def decode_batch(self, seqs: list[list[int]], skip_special_tokens: bool) -> list[str]:
        self.batches.append((len(seqs), skip_special_tokens))
        return self._inner.decode_batch(seqs, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_push_step_decodes_each_settings_group_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    backend = _RecordingBackend(tok.backend_tokenizer)
    monkeypatch.setattr(tok, "_tokenizer", backend)
    settings = [
        {"skip_special_tokens": s, "spaces_between_special_tokens": p} for s in (True, False) for p in (True, False)
    ]
    per_group = MIN_BATCH_DECODE  # byte-level: each request decodes one sequence, its unemitted ids
    detoks = [IncrementalDetokenizer(tok, tok.encode("Tell me."), **settings[i % 4]) for i in range(4 * per_group)]
    ids = tok.encode(TEXTS["english"])
    texts = [""] * len(detoks)
    for token in ids:
        backend.decodes, backend.batches = 0, []
        for i, delta in enumerate(push_step(detoks, [[token]] * len(detoks))):
            texts[i] += delta
        assert sorted(backend.batches) == [(per_group, False)] * 2 + [(per_group, True)] * 2
        assert backend.decodes == 0
    assert texts == [TEXTS["english"]] * len(detoks)
    assert push_step(detoks, [[]] * len(detoks)) == [""] * len(detoks)

    small = [IncrementalDetokenizer(tok, [], **settings[i % 4]) for i in range(8)]
    backend.decodes, backend.batches = 0, []
    assert push_step(small, [ids[:1]] * len(small)) == ["The"] * len(small)
    assert backend.batches == [] and backend.decodes == len(small), "a small step decodes one sequence a call"


@pytest.mark.parametrize("min_batch", [1, MIN_BATCH_DECODE])
def test_worker_outputs_of_a_batched_step_match_one_request_at_a_time(
    model_dir: str, tokenizer: Any, min_batch: int, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The tokenizer process's per-step path against the same deltas fed one per batch.

    One batch holds two deltas of r1 (its last token, then its abort).
    """
    monkeypatch.setattr(detokenizer, "MIN_BATCH_DECODE", min_batch)
    from tristream import SamplingParams
    from tristream.config import EngineConfig
    from tristream.protocol import GenerateRequest, TokenBatch, TokenDelta
    from tristream.tokenizer_proc.main import TokenizerWorker

    rng = random.Random(0)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    workers = [TokenizerWorker(EngineConfig(model=model_dir, max_model_len=512), str(tmp_path)) for _ in range(2)]
    outputs: dict[str, list[int]] = {}
    for i in range(32):
        rid = f"r{i}"
        stop = ["fox jumps"] if i % 3 == 0 else None
        params = SamplingParams(max_tokens=200, skip_special_tokens=i % 2 == 0, stop=stop)
        for worker in workers:
            worker.admit(GenerateRequest(rid, params, time.time(), prompt=f"Q{i}: say something."))
        names = rng.sample(sorted(TEXTS), 2)
        outputs[rid] = tokenizer.encode(TEXTS[names[0]]) + [im_end] + tokenizer.encode(TEXTS[names[1]])
    # r1 is aborted in the batch that carries its 6th and last token.
    outputs["r1"] = outputs["r1"][:6]
    steps = []
    for step in range(max(map(len, outputs.values()))):
        batch = []
        for rid, ids in outputs.items():
            if step < len(ids):
                last = step == len(ids) - 1
                batch.append(TokenDelta(rid, [ids[step]], finish_reason="length" if last and rid != "r1" else None))
                if last and rid == "r1":
                    batch.append(TokenDelta(rid, [], finish_reason="abort"))
        steps.append(batch)
    together, one_by_one, stopped_together, stopped_one_by_one = [], [], [], []
    for batch in steps:
        out, stopped = workers[0].outputs(TokenBatch(batch))
        together += out
        stopped_together += stopped
        for delta in batch:
            out, stopped = workers[1].outputs(TokenBatch([delta]))
            one_by_one += out
            stopped_one_by_one += stopped
    assert together == one_by_one
    assert (
        sorted(stopped_together)
        == sorted(stopped_one_by_one)
        == sorted(f"r{i}" for i in range(0, 32, 3) if "fox jumps" in tokenizer.decode(outputs[f"r{i}"]))
    )
    assert stopped_together
    assert [o.finish_reason for o in together if o.request_id == "r1"][-2:] == [None, "abort"]
    assert not workers[0].active
    for rid, ids in outputs.items():
        text = "".join(o.text for o in together if o.request_id == rid)
        full = tokenizer.decode(ids, skip_special_tokens=int(rid[1:]) % 2 == 0)
        assert text == (full[: full.index("fox jumps")] if rid in stopped_together else full)
