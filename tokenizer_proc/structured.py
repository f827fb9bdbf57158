"""Structured output: validate a request's constraint and describe it for the gpu_proc to compile."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import xgrammar as xgr

from tristream.sampling_params import StructuredOutput

# JSON without free whitespace (xgrammar's ", " and ": " separators), so a small model can't loop on whitespace;
# gpu_proc/grammar.py compiles with the same option.
_PARSERS = {
    "json_schema": lambda text: xgr.Grammar.from_json_schema(text, any_whitespace=False),
    "regex": xgr.Grammar.from_regex,
    "ebnf": xgr.Grammar.from_ebnf,
}
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


@lru_cache(maxsize=256)
def _parse(kind: str, text: str) -> None:
    _PARSERS[kind](text)


def _canonical(node: object, ordered: bool = False) -> object:
    """``node`` with sorted keys, except in a schema's "properties": their order is the output's."""
    if isinstance(node, dict):
        items = node.items() if ordered else sorted(node.items())
        return {k: _canonical(v, not ordered and k == "properties") for k, v in items}
    return [_canonical(v) for v in node] if isinstance(node, list) else node


def _schema_text(schema: dict | str) -> str:
    """The schema as canonical JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured.json: invalid JSON schema: not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"structured.json: invalid JSON schema: must be a JSON object, got {type(schema).__name__}")
    try:
        return json.dumps(_canonical(schema))
    except (TypeError, ValueError) as e:
        raise ValueError(f"structured.json: invalid JSON schema: {e}") from None


def grammar_spec(structured: StructuredOutput) -> tuple[str, str]:
    """(kind, text): a canonical, hashable description of the constraint, for the gpu_proc to compile.

    Kinds: "json_schema", "json_object" (text ""), "regex" and "ebnf" (also for ``choice``).
    Raises ValueError naming the field for an invalid schema, regex or grammar.
    """
    s = structured
    if s.json_object:
        return "json_object", ""
    if s.json is not None:
        field, what, kind, text = "json", "JSON schema", "json_schema", _schema_text(s.json)
    elif s.regex is not None:
        field, what, kind, text = "regex", "regex", "regex", s.regex
    elif s.grammar is not None:
        field, what, kind, text = "grammar", "grammar", "ebnf", s.grammar
    else:
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in s.choice)
        field, what, kind, text = "choice", "choice", "ebnf", f"root ::= {alternatives}"
    try:
        _parse(kind, text)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"structured.{field}: invalid {what}: {_XGR_PREFIX.sub('', str(e)).strip()}") from None
    return kind, text
