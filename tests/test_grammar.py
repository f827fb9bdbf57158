"""Structured output: the bitmask, the request's grammar spec, and xgrammar-constrained decoding without a model."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from tristream.gpu_proc.grammar import GrammarMatchers, accept_each, apply_token_bitmask
from tristream.model_config import ModelConfig
from tristream.sampling_params import StructuredOutput
from tristream.tokenizer_proc.structured import grammar_spec

CPU = torch.device("cpu")
PAD = 77  # the model's vocabulary is padded past the tokenizer's, and not to a multiple of 32
MAX_TOKENS = 300

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "tags", "address"],
}
REGEX = r"[a-z]{2,6}-\d{3}(\.[A-Z]{1,4})?"
CHOICES = ("yes", "no", "maybe so", 'naïve "quoted" \\ text')


@pytest.fixture(scope="module")
def eos(model_dir: str) -> list[int]:
    return ModelConfig.load(model_dir).eos_token_ids


@pytest.fixture(scope="module")
def matchers(model_dir: str, tokenizer, eos: list[int]) -> GrammarMatchers:
    return GrammarMatchers(model_dir, len(tokenizer) + PAD, eos, CPU)


def generate(
    matchers: GrammarMatchers, spec: tuple[str, str], seeds: list[int], prefix: list[int] | None = None
) -> list[list[int]]:
    """Decode one slot per seed from random logits under the grammar: the outputs, EOS left out."""
    slots = list(range(len(seeds)))
    for slot in slots:
        matchers.add(slot, spec, prefix or [])
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    outputs = [list(prefix or []) for _ in slots]
    active = slots
    for _ in range(MAX_TOKENS):
        logits = torch.stack([torch.randn(matchers.vocab_size, generator=gens[s]) for s in active])
        tokens = apply_token_bitmask(logits, matchers.bitmask_of(matchers.of(active))).argmax(dim=-1).tolist()
        accept_each(matchers.of(active), tokens)
        for slot, token in zip(active, tokens):
            if token not in matchers.eos_token_ids:
                outputs[slot].append(token)
        active = [s for s, t in zip(active, tokens) if t not in matchers.eos_token_ids]
        if not active:
            break
    assert not active, f"no EOS within {MAX_TOKENS} tokens"
    for slot in slots:
        matchers.remove(slot)
    return outputs


def allowed(matchers: GrammarMatchers, slot: int) -> list[int]:
    """The tokens the slot's grammar allows next."""
    logits = apply_token_bitmask(torch.zeros(1, matchers.vocab_size), matchers.bitmask_of(matchers.of([slot])))
    return logits[0].isfinite().nonzero()[:, 0].tolist()


# ---------------------------------------------------------------- apply_token_bitmask


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 1000])
def test_apply_token_bitmask_matches_a_loop(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    logits = torch.randn(4, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31, (4, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1
    bitmask[2] = 0
    expected = logits.clone()
    for b in range(4):
        for t in range(vocab):
            if not (int(bitmask[b, t // 32]) >> (t % 32)) & 1:
                expected[b, t] = float("-inf")
    out = apply_token_bitmask(logits, bitmask)
    assert torch.equal(out, expected)
    assert torch.equal(out[1], logits[1]) and bool((out[2] == float("-inf")).all())


def test_apply_token_bitmask_agrees_with_xgrammar_layout(tokenizer, matchers: GrammarMatchers) -> None:
    """The bits xgrammar sets are the tokens it allows: after '{"' under a schema, '"name"' must come."""
    matchers.add(0, grammar_spec(StructuredOutput(json=SCHEMA)), tokenizer.encode('{"'))
    texts = [tokenizer.decode([t]) for t in allowed(matchers, 0)]
    matchers.remove(0)
    assert texts and all('name"'.startswith(t) for t in texts), texts


# ---------------------------------------------------------------- grammar_spec


@pytest.mark.parametrize(
    ("structured", "message"),
    [
        (StructuredOutput(json={"type": "nosuchtype"}), r"structured\.json: invalid JSON schema: .*nosuchtype"),
        (
            StructuredOutput(json={"type": "array", "minItems": 3, "maxItems": 1}),
            r"structured\.json: invalid JSON schema: minItems",
        ),
        (StructuredOutput(json='{"type": "object",'), r"structured\.json: invalid JSON schema: not JSON"),
        (StructuredOutput(json="[1, 2]"), r"structured\.json: invalid JSON schema: must be a JSON object, got list"),
        (StructuredOutput(regex="("), r"structured\.regex: invalid regex: .*parenthesis"),
        (StructuredOutput(grammar='root ::= "a" |'), r"structured\.grammar: invalid grammar: EBNF parser error"),
        (StructuredOutput(grammar='start ::= "a"'), r"structured\.grammar: invalid grammar: .*root"),
        (StructuredOutput(grammar="root ::= foo"), r'structured\.grammar: invalid grammar: .*"foo" is not defined'),
    ],
)
def test_grammar_spec_rejects_invalid(structured: StructuredOutput, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        grammar_spec(structured)


def test_grammar_spec_kinds_and_canonical_schema_text() -> None:
    a = {
        "type": "object",
        "required": ["b", "a"],
        "properties": {"b": {"type": "integer", "minimum": 1}, "a": {"type": "string"}},
    }
    b = {
        "properties": {"b": {"minimum": 1, "type": "integer"}, "a": {"type": "string"}},
        "required": ["b", "a"],
        "type": "object",
    }
    kind, text = grammar_spec(StructuredOutput(json=a))
    assert kind == "json_schema" and json.loads(text) == a
    assert grammar_spec(StructuredOutput(json=b)) == (kind, text)
    assert grammar_spec(StructuredOutput(json=json.dumps(b, indent=2))) == (kind, text)
    assert list(json.loads(text)["properties"]) == ["b", "a"], "property order is the output's order: kept"
    swapped = {**a, "properties": {"a": {"type": "string"}, "b": {"type": "integer", "minimum": 1}}}
    assert grammar_spec(StructuredOutput(json=swapped)) != (kind, text)
    assert grammar_spec(StructuredOutput(json_object=True)) == ("json_object", "")
    assert grammar_spec(StructuredOutput(regex=REGEX)) == ("regex", REGEX)
    assert grammar_spec(StructuredOutput(grammar='root ::= "a"')) == ("ebnf", 'root ::= "a"')
    assert grammar_spec(StructuredOutput(choice=["x", 'y"z'])) == ("ebnf", 'root ::= "x" | "y\\"z"')


# ---------------------------------------------------------------- GrammarMatchers


def test_json_schema_decodes_to_valid_json(tokenizer, matchers: GrammarMatchers) -> None:
    outputs = generate(matchers, grammar_spec(StructuredOutput(json=SCHEMA)), [1, 2, 3, 4, 5])
    for ids in outputs:
        assert max(ids) < len(tokenizer), "padded vocabulary ids are never allowed"
        text = tokenizer.decode(ids)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert list(json.loads(text))[:5] == ["name", "age", "color", "tags", "address"]
    assert len({tuple(ids) for ids in outputs}) > 1


def test_json_object_starts_an_object_and_ends_after_one(tokenizer, matchers: GrammarMatchers, eos: list[int]) -> None:
    spec = grammar_spec(StructuredOutput(json_object=True))
    matchers.add(0, spec, [])
    first = allowed(matchers, 0)
    assert first and all(tokenizer.decode([t]).startswith("{") for t in first)
    matchers.add(0, spec, tokenizer.encode('{"a": [1, {"b": null}], "c": "x"}'))
    assert allowed(matchers, 0) == eos
    matchers.remove(0)


def test_regex_decodes_to_a_match(tokenizer, matchers: GrammarMatchers) -> None:
    spec = grammar_spec(StructuredOutput(regex=REGEX))
    outputs = [tokenizer.decode(ids) for ids in generate(matchers, spec, [1, 2, 3, 4, 5])]
    assert all(re.fullmatch(REGEX, text) for text in outputs), outputs


def test_choice_decodes_to_one_choice(tokenizer, matchers: GrammarMatchers) -> None:
    spec = grammar_spec(StructuredOutput(choice=CHOICES))
    outputs = [tokenizer.decode(ids) for ids in generate(matchers, spec, [1, 2, 3, 4, 5])]
    assert all(text in CHOICES for text in outputs), outputs


def test_replayed_outputs_continue_to_a_valid_completion(tokenizer, matchers: GrammarMatchers) -> None:
    valid = (
        '{"name": "Al", "age": 42, "color": "green", "tags": ["x", "yz"], "address": {"city": "Oslo", "zip": "01234"}}'
    )
    ids = tokenizer.encode(valid)
    spec = grammar_spec(StructuredOutput(json=SCHEMA))
    for cut in (len(ids) // 3, 2 * len(ids) // 3, len(ids)):
        for out in generate(matchers, spec, [7, 8], prefix=ids[:cut]):
            assert out[:cut] == ids[:cut]
            jsonschema.validate(json.loads(tokenizer.decode(out)), SCHEMA)


def test_complete_output_allows_only_eos(matchers: GrammarMatchers, tokenizer, eos: list[int]) -> None:
    matchers.add(0, grammar_spec(StructuredOutput(choice=["yes", "no"])), tokenizer.encode("yes"))
    assert allowed(matchers, 0) == eos
    accept_each(matchers.of([0]), [eos[0]])
    assert bool((matchers.bitmask_of(matchers.of([0])) == -1).all()), "after EOS the slot is unconstrained"
    matchers.remove(0)


def test_rejected_token_warns_and_the_matcher_goes_on(matchers: GrammarMatchers, tokenizer, caplog) -> None:
    matchers.add(0, grammar_spec(StructuredOutput(choice=["yes", "no"])), [])
    before = matchers.bitmask_of(matchers.of([0]))
    accept_each(matchers.of([0]), tokenizer.encode("maybe")[:1])
    assert "rejected token" in caplog.text
    assert torch.equal(matchers.bitmask_of(matchers.of([0])), before)
    matchers.remove(0)


def test_same_spec_compiles_once(matchers: GrammarMatchers, monkeypatch) -> None:
    compiled = []
    compile_ = matchers._compile
    monkeypatch.setattr(matchers, "_compile", lambda spec: compiled.append(spec) or compile_(spec))
    spec, other = ("regex", "once+"), ("regex", "twice+")
    matchers.add(0, spec, [])
    matchers.add(1, spec, [])
    matchers.add(2, other, [])
    matchers.bitmask_of(matchers.of([0, 1, 2]))
    matchers.add(0, spec, [])
    matchers.bitmask_of(matchers.of([0]))
    assert compiled == [spec, other]
    for slot in (0, 1, 2):
        matchers.remove(slot)


def test_mixed_batch_rows(matchers: GrammarMatchers) -> None:
    assert matchers.bitmask_of(matchers.of([0, 1])) is None
    matchers.add(1, grammar_spec(StructuredOutput(regex="a+")), [])
    assert [g is not None for g in matchers.of([1, 0])] == [True, False]
    mask = matchers.bitmask_of(matchers.of([3, 1, 0]))
    assert mask.shape == (3, (matchers.vocab_size + 31) // 32) and mask.dtype == torch.int32
    assert bool((mask[0] == -1).all()) and bool((mask[2] == -1).all()) and not bool((mask[1] == -1).all())
    matchers.remove(1)
    assert matchers.of([1]) == [None] and matchers.bitmask_of(matchers.of([1])) is None
