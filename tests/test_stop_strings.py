"""Stop strings: matched across token boundaries in the tokenizer process, which then ends the request."""

from __future__ import annotations

import pytest

from tristream import SamplingParams
from tristream.tokenizer_proc.detokenizer import IncrementalDetokenizer
from tristream.tokenizer_proc.main import ActiveRequest

TEXT = "The lighthouse keeper wrote: all ships passed safely tonight."


def spanning_stop(tokenizer, ids: list[int]) -> tuple[str, int]:
    """A 4-character string made of the end of token i and the start of token i+1 (first seen there), and i."""
    full = tokenizer.decode(ids)
    for i in range(1, len(ids) - 1):
        left, right = tokenizer.decode(ids[: i + 1]), tokenizer.decode(ids[i + 1 : i + 2])
        stop = left[-2:] + right[:2]
        if len(left) >= 2 and len(right) >= 2 and full.startswith(left) and full.find(stop) == len(left) - 2:
            return stop, i
    raise AssertionError("no usable token boundary")


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_across_tokens_cuts_the_text(tokenizer, include):
    ids = tokenizer.encode(TEXT)
    stop, boundary = spanning_stop(tokenizer, ids)
    req = ActiveRequest(
        "r", 0, IncrementalDetokenizer(tokenizer, []), [], None, stop=[stop, "never appears"], include_stop=include
    )
    emitted, hit_at = [], None
    for i, token in enumerate(ids):
        text, hit = req.take_text(req.detok.push([token]), finished=False)
        emitted.append(text)
        if hit:
            hit_at = i
            break
    full = tokenizer.decode(ids)
    end = full.index(stop) + (len(stop) if include else 0)
    assert hit_at == boundary + 1
    assert "".join(emitted) == full[:end]
    assert all(stop not in t for t in emitted[:-1])


def test_without_a_match_everything_is_emitted_at_the_end(tokenizer):
    ids = tokenizer.encode(TEXT)
    req = ActiveRequest("r", 0, IncrementalDetokenizer(tokenizer, []), [], None, stop=["zebra crossing"])
    parts = [req.take_text(req.detok.push([t]), finished=False)[0] for t in ids[:-1]]
    parts.append(req.take_text(req.detok.push(ids[-1:]), finished=True)[0])
    assert "".join(parts) == tokenizer.decode(ids)
    assert max(len(p) for p in parts[:-1]) < len(tokenizer.decode(ids))  # streamed, not all held


async def test_the_engine_stops_on_a_string_spanning_two_tokens(engine, tokenizer):
    prompt = "Once upon a time"
    base = [out async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))]
    ids = sum((o.outputs[0].token_ids for o in base), [])
    text = "".join(o.outputs[0].text for o in base)
    stop, boundary = spanning_stop(tokenizer, ids)
    for include in (False, True):
        outs = [
            out
            async for out in engine.generate(
                prompt,
                SamplingParams(
                    temperature=0, max_tokens=30, ignore_eos=True, stop=stop, include_stop_str_in_output=include
                ),
            )
        ]
        got = "".join(o.outputs[0].text for o in outs)
        assert got == text[: text.index(stop) + (len(stop) if include else 0)]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "stop"
        assert sum(len(o.outputs[0].token_ids) for o in outs) == boundary + 2
    stats = await engine.get_stats()
    assert stats.num_running == 0


def test_bad_stop_values():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["ok", ""])
    assert SamplingParams(stop="END").stop == ["END"]


async def test_bad_words_are_never_generated(engine, tokenizer):
    prompt = "The history of the lighthouse"
    params = dict(temperature=0, max_tokens=40, ignore_eos=True)
    base = "".join([o.outputs[0].text async for o in engine.generate(prompt, SamplingParams(**params))])
    words = [w.strip(".,;:!?") for w in base.split()]
    single = next(w for w in words if len(w) > 3 and len(tokenizer.encode(" " + w)) == 1)
    multi = next(w for w in words if len(tokenizer.encode(" " + w)) > 1)
    for word in (single, multi):
        out = "".join(
            [o.outputs[0].text async for o in engine.generate(prompt, SamplingParams(**params, bad_words=[word]))]
        )
        assert word in base and word not in out, (word, out)
