"""The tools of a chat request: checked, rendered by the chat template, forced by a grammar, parsed from the reply."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

from tristream.protocol import ToolSpec
from tristream.sampling_params import StructuredOutput
from tristream.tokenizer_proc.structured import grammar_spec
from tristream.tokenizer_proc.tool_calls import FORCED, FORMATS, PARSER_NAMES, ToolCallParser, format_of_template

# OpenAI's rule for function names.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _checked_tool(i: int, tool: object) -> dict:
    """Tool ``i`` as the chat template takes it, ``{"type": "function", "function": {...}}``, or a ValueError."""
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ValueError(f'{where} must be an object {{"type": "function", "function": {{...}}}}')
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"{where}.function must be an object with a name, a description and parameters")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
    if not isinstance(function.get("description", ""), str):
        raise ValueError(f"{where}.function.description must be a string")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ValueError(f"{where}.function.parameters must be a JSON schema object")
    try:
        grammar_spec(StructuredOutput(json=parameters))
    except ValueError as e:
        raise ValueError(f"{where}.function.parameters: {str(e).removeprefix('structured.json: ')}") from None
    return {"type": "function", "function": {**function, "parameters": parameters}}


def _call_schema(tool: dict) -> dict:
    function = tool["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "parameters": function["parameters"]},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


@dataclass
class ChatTools:
    """A request's checked tools (``tools``, for the chat template), the constraint that forces its calls
    (``structured``, for ``tool_choice`` "required" or a named function), and the format its calls are parsed in."""

    tools: list[dict]
    spec: ToolSpec
    structured: StructuredOutput | None
    parsed_format: str | None

    @classmethod
    def of(cls, spec: ToolSpec, template: object, parser: str | None = None, auto: bool = True) -> ChatTools:
        """The tools of ``spec`` for a chat rendered by ``template``; ``parser`` is the engine's
        ``tool_call_parser`` (None: the format the template shows), ``auto`` whether it takes tool_choice
        "auto". A ValueError names what is wrong."""
        if not isinstance(spec.tools, list) or not spec.tools:
            raise ValueError("tools must be a non-empty list of function tools")
        tools = [_checked_tool(i, t) for i, t in enumerate(spec.tools)]
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) < len(names):
            raise ValueError(f"tools: function names must be unique, got {names}")
        if spec.choice != "none" and "tools" not in str(template):
            raise ValueError(
                "tools: this model's chat template does not show the model its tools: start the engine with "
                "chat_template='hermes' (--chat-template hermes) or a template of your own that renders `tools`"
            )
        template_format = tool_format(parser, template)
        structured = None
        if spec.choice == "function":
            if spec.function not in names:
                raise ValueError(f"tool_choice: the function {spec.function!r} is not in tools {names}")
            structured = StructuredOutput(json=tools[names.index(spec.function)]["function"]["parameters"])
        elif spec.choice == "required":
            items = {"anyOf": [_call_schema(t) for t in tools]}
            schema = {"type": "array", "items": items, "minItems": 1, **({} if spec.parallel else {"maxItems": 1})}
            structured = StructuredOutput(json=schema)
        elif spec.choice == "auto" and not auto:
            raise ValueError("tool_choice: 'auto' is off in this engine (enable_auto_tool_choice=False)")
        elif spec.choice == "auto" and template_format is None:
            raise ValueError(
                "tool_choice: 'auto' needs the model's tool call format, which its chat template does not make clear: "
                f"start the engine with tool_call_parser (--tool-call-parser) one of {', '.join(FORMATS)}"
            )
        return cls(tools, spec, structured, template_format if spec.choice == "auto" else None)

    def parser(self) -> ToolCallParser | None:
        """A parser for one sample's reply, or None when the reply is not parsed for calls (``tool_choice`` none)."""
        max_calls = None if self.spec.parallel else 1
        if self.spec.choice == "function":
            return ToolCallParser(FORCED, name=self.spec.function)
        if self.spec.choice == "required":
            return ToolCallParser(FORCED, max_calls=max_calls)
        if self.parsed_format is not None:
            return ToolCallParser(FORMATS[self.parsed_format], max_calls=max_calls)
        return None


def tool_format(parser: str | None, template: object) -> str | None:
    """The call format: the one ``parser`` names, else the one the chat template teaches, when that is clear."""
    if parser is not None:
        return PARSER_NAMES.get(parser, parser)
    return format_of_template(template) if isinstance(template, str) else None


def template_message(message: dict) -> dict:
    """An assistant message's ``tool_calls`` with their JSON ``arguments`` text as objects, as templates render
    them; a message without tool calls unchanged."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    if not isinstance(calls, list):
        raise ValueError("tool_calls must be a list of calls")
    rendered = []
    for call in copy.deepcopy(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError('each of tool_calls must be {"id", "type": "function", "function": {"name", "arguments"}}')
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError as e:
                raise ValueError(f"tool_calls: the arguments of {function['name']!r} are not JSON: {e}") from None
        rendered.append(call)
    return {**message, "tool_calls": rendered}
