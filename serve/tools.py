"""Tool calling (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`): tools go into the prompt through the model's
chat template, `required` and a named function are enforced by a grammar, and the output is parsed into `tool_calls`.

- Prompt: a chat template that knows tools (it mentions `tools`) gets them through transformers'
  `apply_chat_template(tools=...)`; any other template gets FALLBACK_PROMPT as a system message, with the tools as
  JSON and the Hermes format `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
- `tool_choice: "required"`: the output must be a JSON array of calls `[{"name", "arguments"}, ...]` (one call
  when `parallel_tool_calls` is false), each `arguments` matching that tool's parameters schema.
- `tool_choice: {"type": "function", "function": {"name": N}}`: the output is N's arguments, matching its schema.
- `tool_choice: "auto"` (the default with tools): free output, parsed afterwards: `<tool_call>...</tool_call>`
  blocks (Hermes, Qwen), or an answer that is one JSON object (or a list of them) naming a tool.
- `tool_choice: "none"`: the tools stay in the prompt, no call is parsed.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.engine.core.sampling_params import StructuredOutput
from loraplex.serve.errors import InvalidRequestError

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
FALLBACK_PROMPT = (
    "You can call these functions (JSON schemas of their parameters):\n{tools}\n\n"
    "To call one, answer with <tool_call>{{\"name\": <function name>, \"arguments\": <JSON object>}}</tool_call> "
    "(several such blocks to call several). Otherwise answer normally.")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: ToolCallFunction


def tool_mode(tools: list[ToolDefinition] | None, tool_choice: ToolChoice | None) -> str | NamedToolChoice:
    """"none" (no tools, or tool_choice none), "auto", "required", or the named choice."""
    if not tools:
        return "none"
    return tool_choice if tool_choice is not None else "auto"


def check_tool_choice(tools: list[ToolDefinition] | None, tool_choice: ToolChoice | None) -> None:
    """InvalidRequestError (400, naming the field) for tools or a choice that cannot be honoured."""
    names = {t.function.name for t in tools or ()}
    if len(names) != len(tools or ()):
        raise InvalidRequestError("tools repeat a function name", param="tools")
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
        raise InvalidRequestError(f"tool_choice names a function that is not in tools: "
                                  f"{tool_choice.function.name!r}", param="tool_choice")
    if tool_choice == "required" and not names:
        raise InvalidRequestError("tool_choice is 'required' but no tools are given", param="tool_choice")


def template_supports_tools(tokenizer: Any) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    return "tools" in (template or "")


def conversation(messages: list[Any], tools: list[ToolDefinition] | None, native: bool) -> list[dict]:
    """Chat messages as template input. Without native tool support, assistant tool calls become Hermes blocks in
    their content, and the tools a system message (FALLBACK_PROMPT) in front."""
    out = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _json_or_text(c.function.arguments)} for c in m.tool_calls]
            if native:
                entry["tool_calls"] = [{"type": "function", "id": c.id, "function": call}
                                       for c, call in zip(m.tool_calls, calls)]
            else:
                blocks = "\n".join(f"<tool_call>{json.dumps(call)}</tool_call>" for call in calls)
                entry["content"] = f"{entry['content']}\n{blocks}" if entry["content"] else blocks
        if m.tool_call_id is not None and native:
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    if tools and not native:
        listing = json.dumps([t.function.model_dump(exclude_none=True) for t in tools], indent=1)
        out.insert(0, {"role": "system", "content": FALLBACK_PROMPT.format(tools=listing)})
    return out


def constraint(tools: list[ToolDefinition], mode: str | NamedToolChoice, parallel: bool) -> StructuredOutput | None:
    """The grammar that enforces `required` or a named function; None for auto and none."""
    by_name = {t.function.name: t.function for t in tools}
    if isinstance(mode, NamedToolChoice):
        chosen = by_name[mode.function.name]
        return StructuredOutput("json_schema", json.dumps(chosen.parameters), strict=chosen.strict is not False)
    if mode != "required":
        return None
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": f.parameters},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for name, f in by_name.items()]}
    schema = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    # strict (no undeclared properties) unless every tool opts out; the call objects themselves are always closed
    strict = any(f.strict is not False for f in by_name.values())
    return StructuredOutput("json_schema", json.dumps(schema), strict=strict)


def parse(text: str, tools: list[ToolDefinition], mode: str | NamedToolChoice,
          parallel: bool) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a finished answer."""
    names = {t.function.name for t in tools}
    if isinstance(mode, NamedToolChoice):
        return None, [ToolCall(function=ToolCallFunction(name=mode.function.name, arguments=text.strip()))]
    if mode == "none":
        return text, []
    if mode == "required":
        calls = [_call(c) for c in json.loads(text)]
        return None, calls if parallel else calls[:1]
    calls = []
    for block in TOOL_CALL_BLOCK.findall(text):  # auto: Hermes blocks first
        candidate = _json_or_none(block)
        if isinstance(candidate, dict) and candidate.get("name") in names:
            calls.append(_call(candidate))
    if calls:
        content = TOOL_CALL_BLOCK.sub("", text).strip() or None
    else:  # or an answer that is nothing but a call (or a list of calls) as JSON
        candidate = _json_or_none(text.strip())
        items = candidate if isinstance(candidate, list) else [candidate]
        if items and all(isinstance(c, dict) and c.get("name") in names for c in items):
            calls = [_call(c) for c in items]
        content = None if calls else text
    if not parallel:
        calls = calls[:1]
    return content, calls


def _call(obj: dict) -> ToolCall:
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(function=ToolCallFunction(
        name=obj["name"], arguments=arguments if isinstance(arguments, str) else json.dumps(arguments)))


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _json_or_text(arguments: str) -> Any:
    """Assistant tool-call arguments arrive as JSON text; templates expect the object."""
    value = _json_or_none(arguments)
    return arguments if value is None else value
