"""ThinkParser: streamed <think>...</think> output split into reasoning and content, at any delta boundary."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tristream import SamplingParams
from tristream.config import EngineConfig
from tristream.engine import _Stream
from tristream.outputs import RequestMetrics, accumulate
from tristream.protocol import GenerateRequest, TokenBatch, TokenDelta
from tristream.tokenizer_proc.main import TokenizerWorker
from tristream.tokenizer_proc.reasoning import ThinkParser, opens_reasoning

TEXT = "<think>\nplan\n</think>\n\nanswer"


def stream(deltas: list[str], in_reasoning: bool = False) -> tuple[str, str]:
    """Pushes the deltas (the last with finished=True) and checks the deltas add up to the totals."""
    parser = ThinkParser(in_reasoning)
    outs = [parser.push(d) for d in deltas[:-1]] + [parser.push(deltas[-1] if deltas else "", finished=True)]
    assert "".join(r for r, _ in outs) == parser.reasoning
    assert "".join(c for _, c in outs) == parser.content
    return parser.reasoning, parser.content


def all_two_way_splits(text: str) -> list[list[str]]:
    return [[text[:i], text[i:]] for i in range(len(text) + 1)]


def test_whole_string_at_once():
    assert stream([TEXT]) == ("plan\n", "answer")


@pytest.mark.parametrize("deltas", all_two_way_splits(TEXT) + [list(TEXT)])
def test_any_split_gives_the_unsplit_result(deltas):
    assert stream(deltas) == stream([TEXT]) == ("plan\n", "answer")


def test_tags_split_into_pieces():
    assert stream(["<th", "ink>", "\n", "plan", "</", "think", ">", "\n", "\nanswer"]) == ("plan", "answer")


@pytest.mark.parametrize("text", ["hello world", "<thanks> a lot", "<b>bold</b>", "  <thin air", "x<think>y</think>z"])
def test_untagged_output_is_all_content(text):
    assert stream([text]) == ("", text)
    assert stream(list(text)) == ("", text)


def test_leading_whitespace_before_the_open_tag_is_dropped():
    assert stream([" ", "\n <th", "ink>r</think>c"]) == ("r", "c")


def test_a_second_think_after_the_close_is_content():
    assert stream(["<think>a</think>b<think>c</think>"]) == ("a", "b<think>c</think>")


def test_in_reasoning_starts_inside_the_block():
    assert stream(["plan</think>answer"], in_reasoning=True) == ("plan", "answer")
    assert stream(list("\nplan</think>\nanswer"), in_reasoning=True) == ("plan", "answer")
    assert stream(["<think>x</think>y"], in_reasoning=True) == ("<think>x", "y")


def test_unterminated_reasoning_is_all_reasoning():
    assert stream(["<think>\nstill thinking", " when the tokens ran out"]) == (
        "still thinking when the tokens ran out",
        "",
    )


def test_held_partial_tags_are_flushed_to_the_right_side_at_finish():
    assert stream(["  <th"]) == ("", "  <th")
    assert stream(["<think>plan </thi"]) == ("plan </thi", "")
    assert stream(["plan", "</"], in_reasoning=True) == ("plan</", "")


def test_hold_back_is_minimal():
    parser = ThinkParser(in_reasoning=True)
    assert parser.push("ab<") == ("ab", "")
    assert parser.push("c") == ("<c", "")
    assert parser.push("x</th") == ("x", "")
    assert parser.push("ink>") == ("", "")
    assert parser.push("\n") == ("", "")
    assert parser.push("done <") == ("", "done <")


def test_held_start_emits_nothing_until_decided():
    parser = ThinkParser()
    assert parser.push("  <th") == ("", "")
    assert parser.push("e") == ("", "  <the")
    assert parser.push("<think>") == ("", "<think>")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>old</think> then <think>", True),
        ("", False),
    ],
)
def test_opens_reasoning(prompt, expected):
    assert opens_reasoning(prompt) is expected


TAGGY = st.text(alphabet="<>/thinkab \n", max_size=30)


@given(TAGGY, st.lists(st.integers(min_value=0, max_value=30)), st.booleans())
def test_random_splits_reproduce_the_one_shot_result(text, cuts, in_reasoning):
    cuts = sorted({min(c, len(text)) for c in cuts})
    deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    assert stream(deltas, in_reasoning) == stream([text], in_reasoning)


@given(st.text(alphabet="abc \n", max_size=20), st.text(alphabet="ab<>/ \n", max_size=20))
def test_random_pairs_round_trip(reasoning, content):
    reasoning, content = reasoning.lstrip("\n"), content.lstrip("\n")
    assert stream(list(f"<think>\n{reasoning}</think>\n{content}")) == (reasoning, content)


def test_the_tokenizer_process_splits_reasoning_from_a_token_stream(model_dir, tokenizer, tmp_path):
    """Real token ids, one per delta, with both tags split across several tokens."""
    worker = TokenizerWorker(EngineConfig(model=model_dir, max_model_len=512, reasoning_parser="think"), str(tmp_path))
    params = SamplingParams(max_tokens=100)
    (spec,) = worker.admit(GenerateRequest("r", params, time.time(), prompt="Q: hi\nA:"))
    ids = tokenizer.encode("<think>\nThe user greets me.\n</think>\n\nHello there!", add_special_tokens=False)
    assert len(tokenizer.encode("<think>", add_special_tokens=False)) > 1, "the tag must span tokens for this test"
    stream = _Stream("r", None, params, RequestMetrics(time.time()), reasoning=True)
    final = None
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        (delta,), _ = worker.outputs(TokenBatch([TokenDelta("r", [token], finish_reason="stop" if last else None)]))
        assert "<" not in delta.reasoning + delta.text
        final = accumulate(final, stream.output(delta))
    out = final.outputs[0]
    assert (out.reasoning_content, out.text) == ("The user greets me.\n", "Hello there!")
    assert out.token_ids == ids and final.finished
