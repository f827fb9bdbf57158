"""Streaming extraction of tool calls from a completion's text, in the formats models are trained to write.

A call is a JSON object ``{"name": ..., "arguments": {...}}`` (``"parameters"`` in Llama 3's format). Where
the calls sit depends on the format: inside ``<tool_call>...</tool_call>`` blocks (Hermes, Qwen), after
``[TOOL_CALLS]`` (Mistral), or as the whole reply (Llama 3's JSON, and the JSON that ``tool_choice`` "required"
and a named function force). Text outside the calls is the reply's content. A call's ``arguments`` are the
exact JSON text the model wrote, streamed as it arrives: a stream's deltas add up to the whole reply's calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from tristream.outputs import ToolCall

ARGUMENT_KEYS = ("arguments", "parameters")
# An object that opens with its name, then its arguments: both are known before the object ends.
_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
# What the scan of an object stops at: outside strings, a quote or a bracket; inside, a quote or a backslash.
_STRUCTURE = re.compile(r'["{}\[\]]')
_STRING_END = re.compile(r'["\\]')


@dataclass(frozen=True)
class ToolFormat:
    """Where a model's calls sit: after ``start`` and up to ``end`` (None: to the end of the text), or when the
    reply opens with a call (``{``, or a list ``[{``) after an optional ``opener``: with ``start`` None only
    then, with ``bare`` also then (a ``start`` that is a special token is gone from text that skips those)."""

    start: str | None
    end: str | None = None
    opener: str = ""
    bare: bool = False


FORMATS = {
    "hermes": ToolFormat("<tool_call>", "</tool_call>"),
    "mistral": ToolFormat("[TOOL_CALLS]", bare=True),
    "llama3_json": ToolFormat(None, opener="<|python_tag|>"),
}
# The JSON that a forced tool_choice's grammar makes the model write.
FORCED = ToolFormat(None)
# vLLM's and SGLang's names of these formats.
PARSER_NAMES = {"hermes": "hermes", "qwen25": "hermes", "qwen": "hermes", "mistral": "mistral", "llama3": "llama3_json"}
PARSERS = (*FORMATS, *(name for name in PARSER_NAMES if name not in FORMATS))


def format_of_template(template: str) -> str | None:
    """The call format a chat template teaches, when exactly one format's markers appear in it."""
    found = [
        name
        for name, markers in (
            ("hermes", ("<tool_call>",)),
            ("mistral", ("[TOOL_CALLS]",)),
            ("llama3_json", ("<|python_tag|>", '"parameters"')),
        )
        if any(m in template for m in markers)
    ]
    return found[0] if len(found) == 1 else None


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class _CallObject:
    """The text of one call's JSON object as it streams in, and how far its structure has been read."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0
        self.depth = 0
        self.in_string = self.escaped = False
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.closed = False

    def feed(self, text: str) -> str:
        """Read ``text`` up to the end of the object; return what follows it."""
        self.text += text
        if self.name is None:
            self._read_head()
        text, pos = self.text, self.pos
        while pos < len(text) and not self.closed:
            if self.escaped:
                pos, self.escaped = pos + 1, False
                continue
            found = (_STRING_END if self.in_string else _STRUCTURE).search(text, pos)
            if found is None:
                pos = len(text)
                break
            pos = found.end()
            self._step(found.group(), pos)
        self.pos = pos
        self.text = text[:pos]
        return text[pos:]

    def _step(self, c: str, end: int) -> None:
        """Take the structural character ``c`` that ends at ``end``."""
        if self.in_string:
            self.escaped = c == "\\"
            self.in_string = self.escaped
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        else:
            self.depth -= 1
            if self.args_start is not None and self.args_end is None and self.depth == 1:
                self.args_end = end
            self.closed = self.depth == 0

    def _read_head(self) -> None:
        head = _HEAD.match(self.text)
        if head is not None and self.text[head.end() :].lstrip()[:1]:
            self.name = json.loads(head.group(1))
            start = head.end() + len(self.text[head.end() :]) - len(self.text[head.end() :].lstrip())
            self.args_start = start if self.text[start] in "{[" else None

    def streamable_args(self) -> str:
        """The arguments text known so far: of an object or array value, as it grows; of any other, nothing."""
        if self.args_start is None:
            return ""
        return self.text[self.args_start : self.args_end if self.args_end is not None else self.pos]

    def whole(self) -> tuple[str, str] | None:
        """(name, arguments text) of the object as a whole, or None when it is no call."""
        try:
            value, _ = json.JSONDecoder().raw_decode(self.text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        if self.args_end is not None:
            return value["name"], self.text[self.args_start : self.args_end]
        args = next((value[k] for k in ARGUMENT_KEYS if k in value), {})
        return value["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


class ToolCallParser:
    """Splits a streamed reply into content and tool call deltas (``push``); ``calls`` counts the calls begun.

    ``name`` (a forced function) means the whole reply is that function's arguments. With ``max_calls``, calls
    past that many are dropped.
    """

    def __init__(self, fmt: ToolFormat, name: str | None = None, max_calls: int | None = None) -> None:
        self.format = fmt
        self.max_calls = max_calls
        self.calls = 0
        self._mode = "opening" if fmt.start is None or fmt.bare else "content"
        self._held = ""
        self._object: _CallObject | None = None
        self._sent_args = 0
        self._announced = False
        if name is not None:
            self._mode = "calls"
            self._open_object().feed('{"name": ' + json.dumps(name) + ', "arguments": ')

    def push(self, text: str, finished: bool = False) -> tuple[str, list[ToolCall]]:
        """Feed the next text delta; returns (content delta, tool call deltas)."""
        text, self._held = self._held + text, ""
        content: list[str] = []
        deltas: list[ToolCall] = []
        while text:
            mode = self._mode
            text = getattr(self, f"_read_{mode}")(text, finished, content, deltas)
            if self._mode == mode and text:
                self._held, text = text, ""
        if finished and self._object is not None:
            self._close_object(content, deltas, ended=False)
        if finished and self._mode == "content" and self._held:
            content.append(self._held)
            self._held = ""
        return "".join(content), deltas

    def _read_opening(self, text: str, finished: bool, content: list[str], deltas: list[ToolCall]) -> str:
        """Before the reply's first visible text: a call there opens the calls, anything else is content."""
        stripped = text.lstrip()
        if self.format.opener and stripped.startswith(self.format.opener):
            stripped = stripped[len(self.format.opener) :].lstrip()
        after_bracket = stripped[1:].lstrip()[:1] if stripped[:1] == "[" else ""
        if stripped[:1] == "{" or after_bracket == "{":
            self._mode = "calls"
            return stripped
        partial = not stripped or self.format.opener.startswith(stripped) or stripped.rstrip() == "["
        if partial and not finished:
            return text
        self._mode = "content"
        return text

    def _read_content(self, text: str, finished: bool, content: list[str], deltas: list[ToolCall]) -> str:
        start = self.format.start
        at = text.find(start) if start is not None else -1
        if at >= 0:
            content.append(text[:at])
            self._mode = "calls"
            return text[at + len(start) :]
        keep = 0 if finished or start is None else _partial_suffix(text, start)
        content.append(text[: len(text) - keep])
        return text[len(text) - keep :]

    def _read_calls(self, text: str, finished: bool, content: list[str], deltas: list[ToolCall]) -> str:
        """Between calls: separators are skipped, ``{`` opens a call, the end marker or other text ends the calls."""
        stripped = text.lstrip(" \t\r\n[],;")
        end = self.format.end
        if end is not None and stripped.startswith(end):
            self._mode = "content"
            return stripped[len(end) :]
        if stripped.startswith("{"):
            self._open_object()
            return stripped
        if not stripped or (end is not None and end.startswith(stripped) and not finished):
            return stripped
        self._mode = "content" if self.format.start is not None else "content_after"
        return stripped

    def _read_content_after(self, text: str, finished: bool, content: list[str], deltas: list[ToolCall]) -> str:
        """Text after the calls of a format that has no start marker: content."""
        content.append(text)
        return ""

    def _read_object(self, text: str, finished: bool, content: list[str], deltas: list[ToolCall]) -> str:
        obj = self._object
        rest = obj.feed(text)
        if obj.name is not None and self._keeps_call():
            self._send(obj.name, obj.streamable_args(), deltas)
        if obj.closed:
            self._close_object(content, deltas, ended=True)
        return rest

    def _open_object(self) -> _CallObject:
        self._object, self._sent_args, self._announced = _CallObject(), 0, False
        self._mode = "object"
        return self._object

    def _keeps_call(self) -> bool:
        return self._announced or self.max_calls is None or self.calls < self.max_calls

    def _send(self, name: str, args: str, deltas: list[ToolCall]) -> None:
        """The deltas of the current call: its id and name once, then arguments past those already sent."""
        if not self._announced:
            self.calls += 1
            deltas.append(ToolCall(self.calls - 1, f"call_{uuid.uuid4().hex[:24]}", name))
            self._announced = True
        if len(args) > self._sent_args:
            deltas.append(ToolCall(self.calls - 1, None, None, args[self._sent_args :]))
            self._sent_args = len(args)

    def _close_object(self, content: list[str], deltas: list[ToolCall], ended: bool) -> None:
        """The current object is complete (``ended``) or the text ended inside it: finish its call, or give
        its text back as content when it is no call."""
        obj, self._object = self._object, None
        self._mode = "calls"
        call = obj.whole() if ended or obj.args_end is not None else None
        if call is None and obj.name is not None and not ended:
            call = obj.name, obj.text[obj.args_start : obj.args_end] if obj.args_start is not None else ""
        if call is None:
            if not self._announced:
                content.append(obj.text)
            return
        if self._keeps_call():
            self._send(*call, deltas)
